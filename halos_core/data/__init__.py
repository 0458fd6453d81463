"""Examples, tokenisation + chat template, collation and loaders (paired/unpaired/grouped/sft).

examples.py  feedback records -> training examples (HALOs semantics, prompt ids scoped per file)
tokenize.py  chat-template tokenisation with HALOs' truncation, labels masked on the prompt
collate.py   padding to the longest of the microbatch; `Microbatch`
loaders.py   deterministic, resumable (by data position), process-sharded loaders
"""
