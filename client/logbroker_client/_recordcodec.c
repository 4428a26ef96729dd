/* The clients' per-record work in C: records.decode_records (every record a consumer reads) and
 * BatchBuilder.append (every record a producer sends, when it has no headers). aiokafka does the same
 * with Cython; records.py keeps the pure-Python paths, which run where no compiler built this module.
 *
 * decode_block(data, count, base_offset, base_timestamp, topic, partition, min_offset, out, record_type,
 *              no_headers) -> bool
 *     Appends a record_type (a tuple subclass: records.Record) for each record of the uncompressed
 *     record section `data` with offset >= min_offset, and answers True; answers False on anything
 *     records._decode_record_block would refuse, and on the few things it accepts that do not fit
 *     64 bits (a huge timestampDelta): the caller removes what was appended and runs the Python decode,
 *     which raises with the reason or decodes the oddity. So every error message lives in records.py.
 *
 * encode_plain(offset_delta, timestamp_delta, key, value) -> bytes
 *     One length-prefixed record without headers, byte for byte what records.encode_record builds.
 *
 * Builder
 *     The base type of records.BatchBuilder: its fields and append() in C (a Python frame per record
 *     cost the producer ~0.4 us, a sixth of its per-record time); records with headers go back to
 *     records.py (BatchBuilder._append_python).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <limits.h>
#include <string.h>

#define MAX_VARINT_BYTES 10
#define RECORD_FIELDS 7

/* ------------------------------------------------------------------------------------------ decode */

/* A zig-zag varint of at most 64 bits from data[*pos:limit]; 0 when it runs past limit or is longer. */
static int read_number(const uint8_t *data, Py_ssize_t *pos, Py_ssize_t limit, int64_t *value)
{
    uint64_t n = 0;
    for (int i = 0; i < MAX_VARINT_BYTES; i++) {
        if (*pos >= limit)
            return 0;
        uint8_t b = data[(*pos)++];
        if (i == MAX_VARINT_BYTES - 1 && (b & 0x7F) > 1)
            return 0;  /* beyond 64 bits: the Python decode handles it */
        n |= (uint64_t)(b & 0x7F) << (7 * i);
        if (b < 0x80) {
            *value = (int64_t)(n >> 1) ^ -(int64_t)(n & 1);
            return 1;
        }
    }
    return 0;
}

/* A key or value of `length` bytes at *pos (-1: null) as a new reference; NULL with no error set when it
 * does not fit the record, NULL with an error set when memory ran out. */
static PyObject *read_bytes(const uint8_t *data, Py_ssize_t *pos, Py_ssize_t limit, int64_t length)
{
    if (length == -1)
        Py_RETURN_NONE;
    if (length < 0 || length > limit - *pos)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize((const char *)data + *pos, (Py_ssize_t)length);
    *pos += (Py_ssize_t)length;
    return out;
}

/* The headers of one record as a new list, or the shared empty tuple when it has none. */
static PyObject *read_headers(const uint8_t *data, Py_ssize_t *pos, Py_ssize_t limit, PyObject *no_headers)
{
    int64_t count, key_bytes, value_bytes;
    if (!read_number(data, pos, limit, &count) || count < 0 || count > (limit - *pos) / 2)
        return NULL;
    if (count == 0) {
        Py_INCREF(no_headers);
        return no_headers;
    }
    PyObject *headers = PyList_New((Py_ssize_t)count);
    if (headers == NULL)
        return NULL;
    for (int64_t i = 0; i < count; i++) {
        if (!read_number(data, pos, limit, &key_bytes) || key_bytes < 0 || key_bytes > limit - *pos)
            goto refuse;
        PyObject *key = PyUnicode_DecodeUTF8((const char *)data + *pos, (Py_ssize_t)key_bytes, "replace");
        if (key == NULL)
            goto refuse;
        *pos += (Py_ssize_t)key_bytes;
        PyObject *value = NULL;
        if (read_number(data, pos, limit, &value_bytes))
            value = read_bytes(data, pos, limit, value_bytes);
        if (value == NULL) {
            Py_DECREF(key);
            goto refuse;
        }
        PyObject *pair = PyTuple_Pack(2, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (pair == NULL)
            goto refuse;
        PyList_SET_ITEM(headers, (Py_ssize_t)i, pair);
    }
    return headers;
refuse:
    Py_DECREF(headers);
    return NULL;
}

typedef struct {
    PyObject *topic, *partition, *out, *no_headers;
    PyTypeObject *record_type;
    int64_t base_offset, base_timestamp, min_offset;
} DecodeContext;

/* A record_type instance of the seven fields (references stolen); NULL on failure (all released). */
static PyObject *make_record(DecodeContext *ctx, int64_t offset, int64_t timestamp, PyObject *key, PyObject *value,
                             PyObject *headers)
{
    PyObject *offset_obj = PyLong_FromLongLong(offset);
    PyObject *timestamp_obj = PyLong_FromLongLong(timestamp);
    PyObject *record = ctx->record_type->tp_alloc(ctx->record_type, RECORD_FIELDS);
    if (offset_obj == NULL || timestamp_obj == NULL || record == NULL) {
        Py_XDECREF(offset_obj);
        Py_XDECREF(timestamp_obj);
        Py_XDECREF(record);
        Py_DECREF(key);
        Py_DECREF(value);
        Py_DECREF(headers);
        return NULL;
    }
    Py_INCREF(ctx->topic);
    Py_INCREF(ctx->partition);
    PyTuple_SET_ITEM(record, 0, ctx->topic);
    PyTuple_SET_ITEM(record, 1, ctx->partition);
    PyTuple_SET_ITEM(record, 2, offset_obj);
    PyTuple_SET_ITEM(record, 3, timestamp_obj);
    PyTuple_SET_ITEM(record, 4, key);
    PyTuple_SET_ITEM(record, 5, value);
    PyTuple_SET_ITEM(record, 6, headers);
    /* Without headers a record holds only str, int, bytes, None and the shared empty tuple: it can never be
     * part of a reference cycle, so the cycle collector need not track it. Tracked, the records of a large
     * poll set off collections that walk them all again (a third of a consumer's time on 100-byte records). */
    if (headers == ctx->no_headers)
        PyObject_GC_UnTrack(record);
    return record;
}

/* The record at data[*pos:] with offset delta `index`: 1 appended or skipped, 0 refused, -1 error set. */
static int decode_one(DecodeContext *ctx, const uint8_t *data, Py_ssize_t *pos, Py_ssize_t end, int64_t index)
{
    int64_t length, timestamp_delta, offset_delta, key_bytes, value_bytes, timestamp;
    if (!read_number(data, pos, end, &length) || length < 1 || length > end - *pos)
        return 0;
    Py_ssize_t record_end = *pos + (Py_ssize_t)length;
    (*pos)++;  /* attributes: unused */
    if (!read_number(data, pos, record_end, &timestamp_delta) || !read_number(data, pos, record_end, &offset_delta)
        || offset_delta != index || !read_number(data, pos, record_end, &key_bytes))
        return 0;
    if (__builtin_add_overflow(ctx->base_timestamp, timestamp_delta, &timestamp))
        return 0;
    PyObject *key = read_bytes(data, pos, record_end, key_bytes);
    if (key == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *value = NULL;
    if (read_number(data, pos, record_end, &value_bytes))
        value = read_bytes(data, pos, record_end, value_bytes);
    PyObject *headers = value == NULL ? NULL : read_headers(data, pos, record_end, ctx->no_headers);
    if (headers == NULL || *pos != record_end) {
        Py_DECREF(key);
        Py_XDECREF(value);
        Py_XDECREF(headers);
        return PyErr_Occurred() ? -1 : 0;
    }
    if (ctx->base_offset + index < ctx->min_offset) {
        Py_DECREF(key);
        Py_DECREF(value);
        Py_DECREF(headers);
        return 1;
    }
    PyObject *record = make_record(ctx, ctx->base_offset + index, timestamp, key, value, headers);
    if (record == NULL)
        return -1;
    int failed = PyList_Append(ctx->out, record);
    Py_DECREF(record);
    return failed ? -1 : 1;
}

static PyObject *decode_block(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t count;
    DecodeContext ctx;
    if (!PyArg_ParseTuple(args, "y*nLLOOLO!O!O!:decode_block", &view, &count, &ctx.base_offset, &ctx.base_timestamp,
                          &ctx.topic, &ctx.partition, &ctx.min_offset, &PyList_Type, &ctx.out, &PyType_Type,
                          &ctx.record_type, &PyTuple_Type, &ctx.no_headers))
        return NULL;
    if (!PyType_IsSubtype(ctx.record_type, &PyTuple_Type)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "decode_block: record_type must be a tuple subclass");
        return NULL;
    }
    const uint8_t *data = (const uint8_t *)view.buf;
    Py_ssize_t size = view.len, pos = 0;
    int status = 1;
    for (Py_ssize_t index = 0; index < count && status == 1; index++)
        status = decode_one(&ctx, data, &pos, size, (int64_t)index);
    PyBuffer_Release(&view);
    if (status < 0)
        return NULL;
    return PyBool_FromLong(status == 1 && pos == size);
}

/* ------------------------------------------------------------------------------------------ encode */

static Py_ssize_t write_varint(uint8_t *out, int64_t value)
{
    uint64_t n = ((uint64_t)value << 1) ^ (uint64_t)(value >> 63);
    Py_ssize_t i = 0;
    while (n >= 0x80) {
        out[i++] = (uint8_t)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    out[i++] = (uint8_t)n;
    return i;
}

/* A key or value argument: bytes-like or None (length -1). */
static int field_view(PyObject *obj, Py_buffer *view, int64_t *length)
{
    if (obj == Py_None) {
        view->obj = NULL;
        *length = -1;
        return 1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return 0;
    *length = view->len;
    return 1;
}

/* One length-prefixed record without headers, as a new bytes object (NULL with an error set). */
static PyObject *plain_record(long long offset_delta, long long timestamp_delta, PyObject *key_obj,
                              PyObject *value_obj)
{
    Py_buffer key = {0}, value = {0};
    int64_t key_length, value_length;
    if (!field_view(key_obj, &key, &key_length))
        return NULL;
    if (!field_view(value_obj, &value, &value_length)) {
        if (key.obj)
            PyBuffer_Release(&key);
        return NULL;
    }
    uint8_t head[4 * MAX_VARINT_BYTES + 1];
    Py_ssize_t head_size = 0;
    head[head_size++] = 0;  /* attributes */
    head_size += write_varint(head + head_size, timestamp_delta);
    head_size += write_varint(head + head_size, offset_delta);
    head_size += write_varint(head + head_size, key_length);
    uint8_t value_prefix[MAX_VARINT_BYTES];
    Py_ssize_t value_prefix_size = write_varint(value_prefix, value_length);
    Py_ssize_t body = head_size + (key_length > 0 ? key_length : 0) + value_prefix_size
                      + (value_length > 0 ? value_length : 0) + 1;
    uint8_t length_prefix[MAX_VARINT_BYTES];
    Py_ssize_t length_prefix_size = write_varint(length_prefix, body);
    PyObject *out = PyBytes_FromStringAndSize(NULL, length_prefix_size + body);
    if (out != NULL) {
        uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
        memcpy(p, length_prefix, length_prefix_size);
        p += length_prefix_size;
        memcpy(p, head, head_size);
        p += head_size;
        if (key_length > 0) {
            memcpy(p, key.buf, key_length);
            p += key_length;
        }
        memcpy(p, value_prefix, value_prefix_size);
        p += value_prefix_size;
        if (value_length > 0) {
            memcpy(p, value.buf, value_length);
            p += value_length;
        }
        *p = 0;  /* no headers */
    }
    if (key.obj)
        PyBuffer_Release(&key);
    if (value.obj)
        PyBuffer_Release(&value);
    return out;
}


static PyObject *encode_plain(PyObject *module, PyObject *args)
{
    long long offset_delta, timestamp_delta;
    PyObject *key_obj, *value_obj;
    if (!PyArg_ParseTuple(args, "LLOO:encode_plain", &offset_delta, &timestamp_delta, &key_obj, &value_obj))
        return NULL;
    return plain_record(offset_delta, timestamp_delta, key_obj, value_obj);
}

/* ----------------------------------------------------------------------------------------- Builder */

/* The base of records.BatchBuilder: its fields, and append() for a record without headers. A record with
 * headers, or a timestamp delta beyond 64 bits, goes to the subclass's _append_python (records.py), so
 * that the byte layout of those lives in one place. */
typedef struct {
    PyObject_HEAD
    PyObject *parts;            /* list of encoded records */
    Py_ssize_t count;
    Py_ssize_t size_bytes;
    long long base_timestamp;
    long long max_timestamp;
    int compression;
} Builder;

static int Builder_traverse(Builder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->parts);
    return 0;
}

static int Builder_clear(Builder *self)
{
    Py_CLEAR(self->parts);
    return 0;
}

/* Builder is a static type: a Python subclass's dealloc (subtype_dealloc) releases its own type. */
static void Builder_dealloc(Builder *self)
{
    PyObject_GC_UnTrack(self);
    Builder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Builder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Builder *self = (Builder *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->parts = PyList_New(0);
    if (self->parts == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->base_timestamp = self->max_timestamp = -1;
    return (PyObject *)self;
}

static PyObject *append_python(Builder *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *method = PyObject_GetAttrString((PyObject *)self, "_append_python");
    if (method == NULL)
        return NULL;
    PyObject *out = PyObject_Vectorcall(method, args, nargs, NULL);
    Py_DECREF(method);
    return out;
}

/* append(timestamp_ms, key, value, headers=()) -> offset delta of the record in the batch */
static PyObject *Builder_append(Builder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 3 || nargs > 4) {
        PyErr_Format(PyExc_TypeError, "append() takes 3 or 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (nargs == 4) {
        int has_headers = PyObject_IsTrue(args[3]);
        if (has_headers < 0)
            return NULL;
        if (has_headers)
            return append_python(self, args, nargs);
    }
    int overflow = 0;
    long long timestamp_ms = PyLong_AsLongLongAndOverflow(args[0], &overflow);
    if (timestamp_ms == -1 && PyErr_Occurred())
        return NULL;
    long long base = self->count == 0 ? timestamp_ms : self->base_timestamp;
    long long timestamp_delta;
    /* A delta beyond 64 bits is the Python path's (the varint wraps there as Kafka's does). */
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "timestamp_ms %R does not fit a record batch's 64-bit timestamp", args[0]);
        return NULL;
    }
    if (__builtin_sub_overflow(timestamp_ms, base, &timestamp_delta) || timestamp_delta == LLONG_MIN)
        return append_python(self, args, nargs);
    if (self->parts == NULL) {  /* only after the cycle collector cleared it */
        PyErr_SetString(PyExc_RuntimeError, "append() on a cleared batch builder");
        return NULL;
    }
    Py_ssize_t offset_delta = self->count;
    PyObject *record = plain_record(offset_delta, timestamp_delta, args[1], args[2]);
    if (record == NULL)
        return NULL;
    if (PyList_Append(self->parts, record) < 0) {
        Py_DECREF(record);
        return NULL;
    }
    if (offset_delta == 0)
        self->base_timestamp = self->max_timestamp = timestamp_ms;
    else if (timestamp_ms > self->max_timestamp)
        self->max_timestamp = timestamp_ms;
    self->count = offset_delta + 1;
    self->size_bytes += PyBytes_GET_SIZE(record);
    Py_DECREF(record);
    return PyLong_FromSsize_t(offset_delta);
}

static PyMethodDef Builder_methods[] = {
    {"append", (PyCFunction)(void (*)(void))Builder_append, METH_FASTCALL,
     "append(timestamp_ms, key, value, headers=()) -> int: add a record; its offset delta within the batch."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Builder_members[] = {
    {"_parts", T_OBJECT_EX, offsetof(Builder, parts), READONLY, "the encoded records, in order"},
    {"count", T_PYSSIZET, offsetof(Builder, count), 0, "records appended"},
    {"size_bytes", T_PYSSIZET, offsetof(Builder, size_bytes), 0, "the batch's size uncompressed"},
    {"base_timestamp", T_LONGLONG, offsetof(Builder, base_timestamp), 0, "the first record's timestamp"},
    {"max_timestamp", T_LONGLONG, offsetof(Builder, max_timestamp), 0, "the largest timestamp"},
    {"compression", T_INT, offsetof(Builder, compression), 0, "the batch's codec"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BuilderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "logbroker_client._recordcodec.Builder",
    .tp_basicsize = sizeof(Builder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields and the plain-record append() of records.BatchBuilder.",
    .tp_new = Builder_new,
    .tp_dealloc = (destructor)Builder_dealloc,
    .tp_traverse = (traverseproc)Builder_traverse,
    .tp_clear = (inquiry)Builder_clear,
    .tp_methods = Builder_methods,
    .tp_members = Builder_members,
};

static PyMethodDef methods[] = {
    {"decode_block", decode_block, METH_VARARGS,
     "decode_block(data, count, base_offset, base_timestamp, topic, partition, min_offset, out, record_type, "
     "no_headers) -> bool: append the records of an uncompressed record section to out; False where the Python "
     "decode must look (nothing is raised for bad bytes)."},
    {"encode_plain", encode_plain, METH_VARARGS,
     "encode_plain(offset_delta, timestamp_delta, key, value) -> bytes: one length-prefixed record without "
     "headers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_recordcodec", "The clients' per-record encode and decode, in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__recordcodec(void)
{
    if (PyType_Ready(&BuilderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Builder", (PyObject *)&BuilderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
