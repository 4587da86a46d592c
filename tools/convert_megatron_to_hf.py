from megatron_dapo.cli.convert import megatron_to_hf_main

megatron_to_hf_main()
