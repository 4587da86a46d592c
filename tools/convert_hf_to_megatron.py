from megatron_dapo.cli.convert import hf_to_megatron_main

hf_to_megatron_main()
