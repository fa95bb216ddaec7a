"""finetune-operator: fine-tune Llama 2 7B on Kubernetes from a FineTuneJob resource."""
