from megatron_dapo.cli.prepare_data import main

main()
