// Package socketmap implements Postfix's socketmap protocol
// (socketmap_table(5); SPEC section 1): requests and replies are netstrings,
// a request is "<name> <key>", a reply is one of OK, NOTFOUND, TEMP,
// TIMEOUT or PERM followed by a space and data.
//
// It knows netstrings and connections, not MTA-STS. The server API mirrors
// net/http: a Handler, a HandlerFunc adapter, Serve(net.Listener),
// Shutdown(ctx) and ErrServerClosed.
package socketmap
