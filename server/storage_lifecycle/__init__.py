"""Storage lifecycle: the one module that removes bytes from the data dir, counts them, and checks
that the database and the disk agree.

- `files`: removal primitives and deletion intents. Every removal is planned in a database
  transaction that first changes the rows (a checkpoint's `state`, a tombstone's `deleted_at`) and
  records a `DeletionIntent` with the paths; the bytes go after the commit; `finished_at` is set
  last. A process killed in between leaves an open intent that the sweeper finishes
  (`finish_open_intents`): no row ever points at missing bytes unless it says it was pruned/deleted.
- `retention`: per-run retention (keep the last K rounds whole, drop the optimizer state of older
  ones, later their weights), pins, the dry-run plan, intermediate checkpoints of succeeded rounds.
- `deletion`: DELETE of feedback files, prompt sets, runs and models (409 while in use).
- `usage`: bytes by kind per project, free space, submit-time/launch-time admission, the reference
  log-prob cache's LRU cap.
- `fsck`: every whole checkpoint verifies against its manifest; no file that no row accounts for.

Called by the API (server/api/storage.py and the DELETE routes), the sweeper and the worker.
"""
