from megatron_dapo.data.prepare import main

main()
