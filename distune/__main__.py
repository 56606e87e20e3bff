from distune.cli import main

raise SystemExit(main())
