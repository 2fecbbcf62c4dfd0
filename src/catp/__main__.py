from catp.cli.app import main

main()
