from mfr_sae.cli import main

raise SystemExit(main())
