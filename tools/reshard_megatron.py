from megatron_dapo.cli.convert import reshard_main

reshard_main()
