from machinery.cli import main

raise SystemExit(main())
