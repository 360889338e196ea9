/* benches/load/tls_handshakes.c: an LD_PRELOAD library for wrk's TLS client, used by
 * `TLS=1 benches/load/run.sh`. It wraps OpenSSL's SSL_connect to
 *
 *  - forget the previous connection's session before a new handshake starts, when
 *    TLS_HANDSHAKES_NO_RESUME=1: wrk reuses one SSL object per connection slot
 *    (SSL_shutdown + SSL_clear, then SSL_connect), and SSL_clear keeps the session, so
 *    without this every reconnect offers the last session (a TLS 1.3 PSK from the
 *    server's NewSessionTicket) and a server that accepts it does an abbreviated
 *    handshake: no certificate signature, and no full handshake is measured;
 *  - count the handshakes that completed, full and resumed (SSL_session_reused), and note
 *    the protocol, cipher suite and key exchange group of the first one;
 *
 * and at exit appends one line to the file TLS_HANDSHAKES_OUT:
 *
 *     full=N resumed=M version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 group=X25519
 *
 * so the benchmark can check what it measured. It needs no OpenSSL headers: the few
 * functions it calls are declared below with their OpenSSL 1.1/3.x signatures and looked up
 * at run time (wrk links libssl dynamically on Debian; with a static wrk the file stays
 * empty and the benchmark says the handshakes are unverified).
 *
 * Build: gcc -O2 -shared -fPIC -o tls_handshakes.so tls_handshakes.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
typedef struct ssl_cipher_st SSL_CIPHER;

/* SSL_get_negotiated_group(s) is a macro for this SSL_ctrl command (OpenSSL 3.0 ssl.h). */
#define SSL_CTRL_GET_NEGOTIATED_GROUP 134

static int (*real_connect)(SSL *);
static int (*in_before)(const SSL *);
static int (*set_session)(SSL *, SSL_SESSION *);
static int (*session_reused)(const SSL *);
static const char *(*get_version)(const SSL *);
static const SSL_CIPHER *(*current_cipher)(const SSL *);
static const char *(*cipher_name)(const SSL_CIPHER *);
static long (*ssl_ctrl)(SSL *, int, long, void *);
static const char *(*nid2sn)(int);

static int no_resume;
static unsigned long full, resumed;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t first_lock = PTHREAD_MUTEX_INITIALIZER;
static char first[256];

static void init(void) {
    real_connect = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    in_before = (int (*)(const SSL *))dlsym(RTLD_NEXT, "SSL_in_before");
    set_session = (int (*)(SSL *, SSL_SESSION *))dlsym(RTLD_NEXT, "SSL_set_session");
    session_reused = (int (*)(const SSL *))dlsym(RTLD_NEXT, "SSL_session_reused");
    get_version = (const char *(*)(const SSL *))dlsym(RTLD_NEXT, "SSL_get_version");
    current_cipher = (const SSL_CIPHER *(*)(const SSL *))dlsym(RTLD_NEXT, "SSL_get_current_cipher");
    cipher_name = (const char *(*)(const SSL_CIPHER *))dlsym(RTLD_NEXT, "SSL_CIPHER_get_name");
    ssl_ctrl = (long (*)(SSL *, int, long, void *))dlsym(RTLD_NEXT, "SSL_ctrl");
    nid2sn = (const char *(*)(int))dlsym(RTLD_NEXT, "OBJ_nid2sn");
    const char *v = getenv("TLS_HANDSHAKES_NO_RESUME");
    no_resume = v != NULL && strcmp(v, "1") == 0;
}

int SSL_connect(SSL *s) {
    pthread_once(&once, init);
    if (real_connect == NULL) {
        return -1;
    }
    /* Only before the handshake starts: wrk calls SSL_connect again on WANT_READ/WRITE. */
    if (no_resume && in_before != NULL && set_session != NULL && in_before(s)) {
        set_session(s, NULL);
    }
    int r = real_connect(s);
    if (r == 1) {
        int reused = session_reused != NULL && session_reused(s);
        __atomic_fetch_add(reused ? &resumed : &full, 1, __ATOMIC_RELAXED);
        pthread_mutex_lock(&first_lock);
        if (first[0] == '\0') {
            const SSL_CIPHER *c = current_cipher ? current_cipher(s) : NULL;
            int nid = ssl_ctrl ? (int)ssl_ctrl(s, SSL_CTRL_GET_NEGOTIATED_GROUP, 0, NULL) : 0;
            const char *group = nid > 0 && nid2sn ? nid2sn(nid) : NULL;
            snprintf(first, sizeof first, "version=%s cipher=%s group=%s",
                     get_version ? get_version(s) : "?", c && cipher_name ? cipher_name(c) : "?",
                     group ? group : "?");
        }
        pthread_mutex_unlock(&first_lock);
    }
    return r;
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("TLS_HANDSHAKES_OUT");
    if (path == NULL || (full == 0 && resumed == 0)) {
        return;
    }
    char line[512];
    int n = snprintf(line, sizeof line, "full=%lu resumed=%lu %s\n", full, resumed,
                     first[0] ? first : "version=? cipher=? group=?");
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
        if (write(fd, line, (size_t)n) < 0) { /* nothing to do: the benchmark reports a missing line */ }
        close(fd);
    }
}
