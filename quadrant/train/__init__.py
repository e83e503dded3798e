"""Training: the serving models trained from scratch or fine-tuned (`quadrant train`), see trainer.py."""
