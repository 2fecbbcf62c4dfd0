from catp.cli import main

main()
