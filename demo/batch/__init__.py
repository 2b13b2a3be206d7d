"""The demo estate's legacy batch jobs: the CRM export writer, the warehouse stock
snapshot writer and the loyalty job's points-file reader."""
