"""The trainer that runs inside the FineTuneJob pods (LoRA/QLoRA with TRL and PEFT)."""
