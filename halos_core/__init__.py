"""halos_core: the training library (no HTTP, no DB, no Celery).

Nothing heavy is imported here: the server and worker import the torch-free leaves
(`halos_core.config`, `halos_core.feedback`, `halos_core.run_dir`) and must not pull in torch.
"""
