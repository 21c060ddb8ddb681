"""Retro-fitting a trained GPT into a RETRO (`pipeline`), including Hugging Face GPT-2s (`hf_gpt2`)."""
