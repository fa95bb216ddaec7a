from finetune_operator.kubectl_plugin import main

raise SystemExit(main())
