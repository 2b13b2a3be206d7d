from services.journal.service import JournalService  # noqa: F401  (nameko run services.journal)
