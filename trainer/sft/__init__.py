"""Supervised fine-tuning: the recipe's entry (`recipe`) and evaluation during SFT (`evaluate`)."""
