"""The readers, in one import: bounded file I/O and the inputs table (:mod:`transforms.files`),
notes (:mod:`transforms.note_reader`) and DICOM (:mod:`transforms.dicom_reader`)."""

from .dicom_reader import DecodeDicomFile, ReadDicom
from .files import DEAD, INPUTS, NAMESPACE, OpenFiles, bounded_lines, file_digest, load_processed, read_bounded
from .note_reader import NOTE_FORMATS, ParseNoteFile, ReadNotes, _binary, note_format

__all__ = ["DEAD", "INPUTS", "NAMESPACE", "NOTE_FORMATS", "DecodeDicomFile", "OpenFiles", "ParseNoteFile", "ReadDicom",
           "ReadNotes", "bounded_lines", "file_digest", "load_processed", "note_format", "read_bounded", "_binary"]
