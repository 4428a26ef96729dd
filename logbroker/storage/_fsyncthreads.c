/* fdatasync in native threads that never take the GIL, each completion announced on an eventfd.

Why: a Python thread pool costs the event loop more per fsync than the fsync itself. Each job is a queue put
and a thread wake-up, a worker contending for the GIL before and after its syscall, a call_soon_threadsafe
and a loop wake-up back. Measured on a 2-core VM (benchmarks.latency_floor, three processes, 2,000 fsynced
records/s): 128-134% of a core with asyncio's default pool, 84-92% with these threads, 76% with the fsyncs
on the event loop itself (which would stall it for as long as a disk takes).

The caller hands over a descriptor it owns (a dup of the file's; the thread closes it once synced, so the
file may be closed meanwhile without its number being reused under the fsync) and a token. The threads
fdatasync, close, queue (token, errno) and add one to the eventfd; the event loop watches the eventfd and
collects every finished job with completed(). Nothing here touches Python objects outside the GIL.

    FsyncThreads(threads) -> object with submit(fd, token), completed() -> [(token, errno)], fileno(), close()
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define MAX_THREADS 64
#define MAX_BATCH 32 /* jobs one thread takes at a time: they run one after the other */

typedef struct {
    int fd;
    int err;
    long long token;
} Job;

typedef struct {
    Job *items;
    size_t len;
    size_t cap;
} Jobs;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    pthread_cond_t joined_cond; /* a second close() waits here for the first one's joins */
    Jobs pending;
    Jobs done;
    size_t pending_head; /* pending.items[pending_head:len] wait to be taken */
    pthread_t threads[MAX_THREADS];
    int thread_count;
    int event_fd;
    int stopping;
    int joined; /* every thread joined (by the first caller of stop_threads) */
    int initialised;
} FsyncThreads;

static int jobs_push(Jobs *jobs, Job job) {
    if (jobs->len == jobs->cap) {
        size_t cap = jobs->cap ? jobs->cap * 2 : 64;
        Job *items = realloc(jobs->items, cap * sizeof(Job));
        if (items == NULL) return -1;
        jobs->items = items;
        jobs->cap = cap;
    }
    jobs->items[jobs->len++] = job;
    return 0;
}

static void *run_worker(void *arg) {
    FsyncThreads *self = arg;
    Job batch[MAX_BATCH];
    for (;;) {
        pthread_mutex_lock(&self->mutex);
        while (self->pending_head == self->pending.len && !self->stopping)
            pthread_cond_wait(&self->wake, &self->mutex);
        if (self->pending_head == self->pending.len) { /* stopping, and nothing left to sync */
            pthread_mutex_unlock(&self->mutex);
            return NULL;
        }
        size_t count = self->pending.len - self->pending_head;
        if (count > MAX_BATCH) count = MAX_BATCH;
        memcpy(batch, self->pending.items + self->pending_head, count * sizeof(Job));
        self->pending_head += count;
        if (self->pending_head == self->pending.len) self->pending_head = self->pending.len = 0;
        pthread_mutex_unlock(&self->mutex);

        for (size_t i = 0; i < count; i++) {
            batch[i].err = fdatasync(batch[i].fd) == 0 ? 0 : errno;
            close(batch[i].fd);
        }

        int lost = 0;
        pthread_mutex_lock(&self->mutex);
        for (size_t i = 0; i < count; i++) {
            if (jobs_push(&self->done, batch[i]) != 0) lost = 1;
        }
        pthread_mutex_unlock(&self->mutex);
        if (lost) abort(); /* out of memory: a job's waiter would never hear, so stop loudly */
        uint64_t one = 1;
        while (write(self->event_fd, &one, sizeof one) < 0 && errno == EINTR) {
        }
    }
}

static int FsyncThreads_init(FsyncThreads *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"threads", NULL};
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|i", keywords, &threads)) return -1;
    if (self->initialised) {
        PyErr_SetString(PyExc_RuntimeError, "FsyncThreads is already running");
        return -1;
    }
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be 1 to %d, got %d", MAX_THREADS, threads);
        return -1;
    }
    self->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->event_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_mutex_init(&self->mutex, NULL);
    pthread_cond_init(&self->wake, NULL);
    pthread_cond_init(&self->joined_cond, NULL);
    self->initialised = 1;
    for (int i = 0; i < threads; i++) {
        int failed = pthread_create(&self->threads[i], NULL, run_worker, self);
        if (failed) {
            errno = failed;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1; /* the threads already started are stopped by close() or dealloc */
        }
        self->thread_count++;
    }
    return 0;
}

static PyObject *FsyncThreads_submit(FsyncThreads *self, PyObject *args) {
    Job job = {0, 0, 0};
    if (!PyArg_ParseTuple(args, "iL", &job.fd, &job.token)) return NULL;
    if (!self->initialised || (self->thread_count == 0 && !self->stopping)) {
        PyErr_SetString(PyExc_RuntimeError, "FsyncThreads is not running");
        return NULL;
    }
    pthread_mutex_lock(&self->mutex);
    int refused = self->stopping ? 1 : jobs_push(&self->pending, job) != 0 ? 2 : 0;
    if (!refused) pthread_cond_signal(&self->wake);
    pthread_mutex_unlock(&self->mutex);
    if (refused == 1) {
        PyErr_SetString(PyExc_RuntimeError, "FsyncThreads is closed");
        return NULL;
    }
    if (refused == 2) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *FsyncThreads_completed(FsyncThreads *self, PyObject *unused) {
    if (!self->initialised) return PyList_New(0);
    uint64_t count;
    ssize_t got = read(self->event_fd, &count, sizeof count); /* resets it; EAGAIN when nothing came */
    (void)got;
    pthread_mutex_lock(&self->mutex);
    size_t len = self->done.len;
    Job *items = self->done.items;
    self->done.items = NULL;
    self->done.len = self->done.cap = 0;
    pthread_mutex_unlock(&self->mutex);
    PyObject *result = PyList_New((Py_ssize_t)len);
    for (size_t i = 0; result != NULL && i < len; i++) {
        PyObject *pair = Py_BuildValue("(Li)", items[i].token, items[i].err);
        if (pair == NULL) Py_CLEAR(result);
        else PyList_SET_ITEM(result, (Py_ssize_t)i, pair);
    }
    free(items);
    return result;
}

static PyObject *FsyncThreads_fileno(FsyncThreads *self, PyObject *unused) {
    return PyLong_FromLong(self->initialised ? self->event_fd : -1);
}

static void stop_threads(FsyncThreads *self) {
    /* Only the first caller joins (joining a thread twice is undefined); any other waits until it has. */
    pthread_mutex_lock(&self->mutex);
    int first = !self->stopping;
    self->stopping = 1;
    pthread_cond_broadcast(&self->wake);
    if (!first) {
        while (!self->joined) pthread_cond_wait(&self->joined_cond, &self->mutex);
        pthread_mutex_unlock(&self->mutex);
        return;
    }
    int count = self->thread_count;
    pthread_mutex_unlock(&self->mutex);
    for (int i = 0; i < count; i++) pthread_join(self->threads[i], NULL);
    pthread_mutex_lock(&self->mutex);
    self->thread_count = 0;
    self->joined = 1;
    pthread_cond_broadcast(&self->joined_cond);
    pthread_mutex_unlock(&self->mutex);
}

static PyObject *FsyncThreads_close(FsyncThreads *self, PyObject *unused) {
    /* Lets the threads finish every job already submitted (each was promised an answer), then stops them. */
    if (self->initialised) {
        Py_BEGIN_ALLOW_THREADS
        stop_threads(self);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static void FsyncThreads_dealloc(FsyncThreads *self) {
    if (self->initialised) {
        stop_threads(self);
        close(self->event_fd);
        pthread_mutex_destroy(&self->mutex);
        pthread_cond_destroy(&self->wake);
        pthread_cond_destroy(&self->joined_cond);
        free(self->pending.items);
        free(self->done.items);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef FsyncThreads_methods[] = {
    {"submit", (PyCFunction)FsyncThreads_submit, METH_VARARGS,
     "submit(fd, token): fdatasync and then close fd (a descriptor the threads now own) in a thread"},
    {"completed", (PyCFunction)FsyncThreads_completed, METH_NOARGS,
     "completed() -> [(token, errno)]: the jobs finished since the last call (errno 0: synced)"},
    {"fileno", (PyCFunction)FsyncThreads_fileno, METH_NOARGS,
     "fileno() -> the eventfd that becomes readable when jobs finish"},
    {"close", (PyCFunction)FsyncThreads_close, METH_NOARGS,
     "close(): finish the jobs submitted, then stop the threads; later submits raise RuntimeError"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FsyncThreadsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "logbroker.storage._fsyncthreads.FsyncThreads",
    .tp_basicsize = sizeof(FsyncThreads),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "fdatasync in native threads, completions announced on an eventfd",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FsyncThreads_init,
    .tp_dealloc = (destructor)FsyncThreads_dealloc,
    .tp_methods = FsyncThreads_methods,
};

static struct PyModuleDef fsyncthreads_module = {
    PyModuleDef_HEAD_INIT, "_fsyncthreads", "fdatasync in native threads (see the C file's header)", -1, NULL,
};

PyMODINIT_FUNC PyInit__fsyncthreads(void) {
    if (PyType_Ready(&FsyncThreadsType) < 0) return NULL;
    PyObject *module = PyModule_Create(&fsyncthreads_module);
    if (module == NULL) return NULL;
    Py_INCREF(&FsyncThreadsType);
    if (PyModule_AddObject(module, "FsyncThreads", (PyObject *)&FsyncThreadsType) < 0) {
        Py_DECREF(&FsyncThreadsType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
