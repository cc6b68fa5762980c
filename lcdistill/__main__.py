from lcdistill.cli import main

main()
