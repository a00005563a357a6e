from airflow_glidein.cli import main

raise SystemExit(main())
