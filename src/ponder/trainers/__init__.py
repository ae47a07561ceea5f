"""One `XTrainer` + `XConfig` per method (TRL's shape); configs extend `transformers.TrainingArguments`."""
