from services.files.service import FilesService  # noqa: F401  (nameko run services.files)
