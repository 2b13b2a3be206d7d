"""File drops: legacy batch files in (`file_drop` entrypoint) and out (`BatchFileWriter`).

Generic on purpose: these modules move rows and files and know no retail
contract; the service that uses them maps rows to messages.

The inbound pipeline, one module a stage:

    wakeup.py   inotify wakes the watcher when the folder changes (the poll stays as timeout)
      -> inbound.py   takes only complete files, runs the two passes, archives or rejects
      -> count.py     pass 1 on blocks of bytes: sha256, record count, header and trailer
         (layout.py `Layout.scan` is the exact pass for any file count.py cannot vouch for)
      -> records.py   pass 2: the bytes pass 1 hashed become numbered records, in blocks
      -> columns.py   a clean block of plain CSV validated a column at a time
         | rowcode.py the generated row loop for every other block (and rows columns refuses)
      -> ledger.py    the durable checkpoint: what was taken, how far it got

Outbound: outbound.py collects events into a batch file (temp file, fsync, atomic rename,
done marker) for a legacy job. config.py is filedrops.yaml; files.py the safe opening and
moving of files inside a drop folder.

Each fast path is kept equal to its reference implementation by a unit test:
count.py to the exact pass (tests/unit/test_filedrop_count.py::
test_a_plain_file_is_counted_on_blocks_as_the_exact_pass_counts_it), records.py's block
reading to the exact pass (test_filedrop_count.py::
test_pass_two_reads_a_plain_file_on_blocks_as_the_exact_pass_reads_it), rowcode.py to
`Layout.row` (tests/unit/test_filedrop.py::test_generated_row_loop_agrees_with_the_reference_row)
and to orjson (test_filedrop.py::test_json_safe_text_is_what_orjson_writes_between_quotes),
columns.py to the row loop (tests/unit/test_filedrop_columns.py::
test_a_customer_block_is_read_alike_by_columns_and_by_the_row_loop).
"""
