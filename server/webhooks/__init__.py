"""Outbound webhooks: the outbox dispatcher (`dispatcher.py`), Standard Webhooks signing
(`signing.py`) and the address guard every delivery goes through (`addresses.py`)."""
