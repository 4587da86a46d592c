from megatron_dapo.checkpoint.convert import megatron_to_hf_main

megatron_to_hf_main()
