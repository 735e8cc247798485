"""The frontend's request side: checking and tokenizing inputs, sending them, routing replies."""
