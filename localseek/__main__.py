from localseek.cli.main import main

raise SystemExit(main())
