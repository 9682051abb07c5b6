/* Stand-in for OpenSSH's autoconf includes.h: just what sk-dummy needs on glibc with OpenSSL 3. */
#ifndef BASTION_SK_DUMMY_INCLUDES_H
#define BASTION_SK_DUMMY_INCLUDES_H
#define _GNU_SOURCE 1
#define WITH_OPENSSL 1
#define OPENSSL_HAS_ECC 1
#define OPENSSL_HAS_ED25519 1
#include <sys/types.h>
#include <stdlib.h>
#include <string.h>
#endif
