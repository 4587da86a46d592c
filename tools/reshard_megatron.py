from megatron_dapo.checkpoint.convert import reshard_main

reshard_main()
