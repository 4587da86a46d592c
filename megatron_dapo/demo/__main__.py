from megatron_dapo.demo.run import main

main()
