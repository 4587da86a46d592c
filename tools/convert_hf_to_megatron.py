from megatron_dapo.checkpoint.convert import hf_to_megatron_main

hf_to_megatron_main()
