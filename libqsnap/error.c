/*
 * error.c - error messages and codes.
 *
 * Every message names the file, the field and the value.  The handle keeps
 * the last one (qsnap_errmsg); calls without a handle write to a caller's
 * buffer.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "qs_int.h"

QSNAP_API const char *qsnap_version(void)
{
    return PACKAGE_VERSION;
}

QSNAP_API const char *qsnap_strerror(int err)
{
    if (err < 0) {
        err = -err;
    }
    switch (err) {
    case 0:
        return "Success";
    case EUCLEAN:
        return "Image metadata is corrupt";
    case ENOTSUP:
        return "Operation or image feature not supported";
    case EAGAIN:
        return "Image is locked by another process";
    default:
        return strerror(err);
    }
}

void qs_fmt_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void set_msg(struct qsnap_image *img, const char *fmt, va_list ap)
{
    pthread_mutex_lock(&img->err_mtx);
    vsnprintf(img->errmsg, sizeof(img->errmsg), fmt, ap);
    pthread_mutex_unlock(&img->err_mtx);
}

int qs_error(struct qsnap_image *img, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_msg(img, fmt, ap);
    va_end(ap);
    return code;
}

int qs_corrupt(struct qsnap_image *img, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_msg(img, fmt, ap);
    va_end(ap);
    img->corrupt = true;
    return -EUCLEAN;
}

QSNAP_API const char *qsnap_errmsg(const qsnap_image *img)
{
    return img ? img->errmsg : "";
}

QSNAP_API void qsnap_errmsg_copy(qsnap_image *img, char *buf, size_t len)
{
    if (!buf || len == 0) {
        return;
    }
    if (!img) {
        buf[0] = '\0';
        return;
    }
    pthread_mutex_lock(&img->err_mtx);
    snprintf(buf, len, "%s", img->errmsg);
    pthread_mutex_unlock(&img->err_mtx);
}
