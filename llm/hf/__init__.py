"""Standalone Hugging Face modelling code for exported Blueberry decoders (copied into each export
by llm/export.py); it imports only torch and transformers."""
