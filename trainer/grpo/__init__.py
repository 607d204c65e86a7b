"""GRPO fine-tuning: the recipe's entry (`recipe`), its schema (`config`), the rollout batch source (`rollout`), rewards, the clipped-ratio loss (`loss`) and routing replay."""
