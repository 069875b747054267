from funchess.cli import main

raise SystemExit(main())
