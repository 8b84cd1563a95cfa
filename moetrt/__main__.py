from moetrt.cli import main

main()
