from migrate_data.cli import main

main()
