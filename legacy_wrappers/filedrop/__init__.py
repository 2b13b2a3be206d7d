"""File drops: legacy batch files in (`file_drop` entrypoint) and out (`BatchFileWriter`).

Generic on purpose: these modules move rows and files and know no retail
contract; the service that uses them maps rows to messages.
"""
