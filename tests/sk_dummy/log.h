/* Stand-in for OpenSSH's log.h: sk-dummy's helpers log nothing. */
#define debug3_f(...) do { } while (0)
#define debug_f(...) do { } while (0)
