from magne.cli import main

raise SystemExit(main())
