/* The record walk of records.validate_records, in C: the broker runs it on every produced record, and
 * in Python it cost more than the rest of a produce request (see benchmarks/README.md).
 *
 * records_agree(data, start, end, count) -> bool answers whether data[start:end] holds exactly `count`
 * well-framed records with offset deltas 0..count-1. It accepts exactly what records._walk_records
 * accepts (tests/client/test_record_validation.py compares the two); when it says no, the caller
 * runs the Python walk to say why, so every error message lives in one place.
 *
 * Every read stays below the current record's end. The Python walk may read further, but its
 * position only moves forward and must land on the record's end, so it refuses the same records.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_VARINT_BYTES 10

/* One zig-zag varint from data[*pos:limit]. Returns 0 when limit or 10 bytes pass first. *huge is
 * set when the unsigned value needs more than 64 bits: Python decodes it (its ints are unbounded)
 * into a length or delta no record can have, which only a timestampDelta may carry. */
static int read_varint(const uint8_t *data, Py_ssize_t *pos, Py_ssize_t limit, int64_t *value, int *huge)
{
    uint64_t n = 0;
    *huge = 0;
    for (int i = 0; i < MAX_VARINT_BYTES; i++) {
        if (*pos >= limit)
            return 0;
        uint8_t b = data[(*pos)++];
        if (i == MAX_VARINT_BYTES - 1 && (b & 0x7F) > 1)
            *huge = 1;
        n |= (uint64_t)(b & 0x7F) << (7 * i);
        if (b < 0x80) {
            *value = (int64_t)(n >> 1) ^ -(int64_t)(n & 1);
            return 1;
        }
    }
    return 0;
}

/* A length or delta: a varint that fits in 64 bits. */
static int read_number(const uint8_t *data, Py_ssize_t *pos, Py_ssize_t limit, int64_t *value)
{
    int huge;
    return read_varint(data, pos, limit, value, &huge) && !huge;
}

/* Move past `bytes` bytes (a key or value; -1 is null) without leaving the record. */
static int skip_field(Py_ssize_t *pos, Py_ssize_t limit, int64_t bytes)
{
    if (bytes < -1 || (bytes > 0 && bytes > limit - *pos))
        return 0;
    if (bytes > 0)
        *pos += (Py_ssize_t)bytes;
    return 1;
}

static int headers_fit(const uint8_t *data, Py_ssize_t *pos, Py_ssize_t limit)
{
    int64_t count, key_bytes, value_bytes;
    if (!read_number(data, pos, limit, &count) || count < 0 || count > (limit - *pos) / 2)
        return 0;  /* each header takes two bytes at least */
    for (int64_t i = 0; i < count; i++) {
        if (!read_number(data, pos, limit, &key_bytes) || key_bytes < 0 || !skip_field(pos, limit, key_bytes))
            return 0;
        if (!read_number(data, pos, limit, &value_bytes) || !skip_field(pos, limit, value_bytes))
            return 0;
    }
    return 1;
}

/* The record at data[*pos:end] with offset delta `index`; *pos moves to its end. */
static int record_fits(const uint8_t *data, Py_ssize_t *pos, Py_ssize_t end, int64_t index)
{
    int64_t length, delta, key_bytes, value_bytes, ignored;
    int huge;
    if (!read_number(data, pos, end, &length) || length < 1 || length > end - *pos)
        return 0;
    Py_ssize_t record_end = *pos + (Py_ssize_t)length;
    (*pos)++;  /* attributes: unused, any value; length >= 1 keeps it inside */
    if (!read_varint(data, pos, record_end, &ignored, &huge))  /* timestampDelta: any value */
        return 0;
    if (!read_number(data, pos, record_end, &delta) || delta != index)
        return 0;
    if (!read_number(data, pos, record_end, &key_bytes) || !skip_field(pos, record_end, key_bytes))
        return 0;
    if (!read_number(data, pos, record_end, &value_bytes) || !skip_field(pos, record_end, value_bytes))
        return 0;
    if (!headers_fit(data, pos, record_end))
        return 0;
    return *pos == record_end;
}

static PyObject *records_agree(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, end, count;
    if (!PyArg_ParseTuple(args, "y*nnn:records_agree", &view, &start, &end, &count))
        return NULL;
    if (start < 0 || end > view.len || start > end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "records_agree: start and end must lie within the buffer");
        return NULL;
    }
    const uint8_t *data = (const uint8_t *)view.buf;
    Py_ssize_t pos = start;
    int64_t index = 0;
    int ok = 1;
    while (ok && pos < end) {
        ok = record_fits(data, &pos, end, index);
        index++;
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok && index == count);
}

static PyMethodDef methods[] = {
    {"records_agree", records_agree, METH_VARARGS,
     "records_agree(data, start, end, count) -> bool: data[start:end] holds exactly count well-framed "
     "records with offset deltas 0..count-1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_recordwalk", "The record walk of records.validate_records, in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__recordwalk(void)
{
    return PyModule_Create(&module);
}
