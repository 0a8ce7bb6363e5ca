"""Text in, embeddings out: A1111's prompt syntax (prompts.py) and the text encoder's chunked calls (encode.py)."""
