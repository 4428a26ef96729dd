# The C record walk (_recordwalk.c); records.py falls back to its Python walk where it is not built.
from logbroker_client.records import ByteSource

def records_agree(data: ByteSource, start: int, end: int, count: int, /) -> bool: ...
