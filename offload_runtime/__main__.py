from offload_runtime.cli import main

raise SystemExit(main())
