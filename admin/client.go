package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
)

// Errors a Client returns, wrapped in one that says more.
var (
	// ErrUnreachable: nothing answers on the socket, or it may not be
	// used.
	ErrUnreachable = errors.New("admin: socket unreachable")
	// ErrNotCached: the daemon has no entry for the domain.
	ErrNotCached = errors.New("admin: not cached")
	// ErrInvalidDomain: the domain cannot have an MTA-STS policy.
	ErrInvalidDomain = errors.New("admin: invalid domain")
)

// A Client sends admin requests to a running stsmap.
type Client struct {
	// Socket is the path of the daemon's admin socket.
	Socket string
}

// List returns every entry the daemon has cached, sorted by domain.
func (c *Client) List(ctx context.Context) ([]Entry, error) {
	var body listBody
	err := c.do(ctx, http.MethodGet, "/cache", &body)
	return body.Entries, err
}

// Show returns domain's cached entry; the error wraps ErrNotCached when
// there is none.
func (c *Client) Show(ctx context.Context, domain string) (Entry, error) {
	var e Entry
	err := c.do(ctx, http.MethodGet, "/cache/"+url.PathEscape(domain), &e)
	return e, err
}

// Purge removes domain from the daemon's cache and store, so that its next
// lookup discovers the policy afresh.
func (c *Client) Purge(ctx context.Context, domain string) (PurgeResult, error) {
	var r PurgeResult
	err := c.do(ctx, http.MethodDelete, "/cache/"+url.PathEscape(domain), &r)
	return r, err
}

// PurgeAll removes every domain from the daemon's cache and store and
// returns how many it removed.
func (c *Client) PurgeAll(ctx context.Context) (int, error) {
	var r PurgeResult
	err := c.do(ctx, http.MethodDelete, "/cache?all=1", &r)
	return r.Purged, err
}

// Refresh makes the daemon re-check domain now and returns its entry
// afterwards. It waits up to the daemon's fetch.timeout.
func (c *Client) Refresh(ctx context.Context, domain string) (Entry, error) {
	var e Entry
	err := c.do(ctx, http.MethodPost, "/cache/"+url.PathEscape(domain)+"/refresh", &e)
	return e, err
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://stsmap"+path, nil)
	if err != nil {
		return err
	}
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, "unix", c.Socket)
			if err != nil {
				return nil, &unreachableError{socket: c.Socket, err: err}
			}
			return conn, nil
		},
		DisableKeepAlives: true, // one request per command
	}}
	resp, err := hc.Do(req)
	if err != nil {
		if ue, ok := errors.AsType[*unreachableError](err); ok {
			return ue
		}
		if ctx.Err() != nil {
			return fmt.Errorf("waiting for stsmap's answer on %s: %w", c.Socket, ctx.Err())
		}
		return fmt.Errorf("stsmap's admin socket %s: %w", c.Socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return responseError(resp)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("stsmap's answer on %s: %w", c.Socket, err)
	}
	return nil
}

// responseError turns an answer other than 200 into an error.
func responseError(resp *http.Response) error {
	var body errorBody
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &body) != nil || body.Error == "" {
		// Not this package's server: a daemon older than this command
		// answers an unknown path with 404 and plain text.
		return fmt.Errorf("stsmap answered %s to a request it should know; is the daemon older than this stsmap?", resp.Status)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return &answerError{msg: body.Error, kind: ErrNotCached}
	case resp.StatusCode == http.StatusBadRequest && body.Reason != "":
		return &answerError{msg: body.Error, kind: ErrInvalidDomain}
	}
	return errors.New(body.Error)
}

// answerError is the daemon's own message, classified by kind.
type answerError struct {
	msg  string
	kind error
}

func (e *answerError) Error() string { return e.msg }
func (e *answerError) Unwrap() error { return e.kind }

// unreachableError says why a connection to the socket failed and what to
// do about it.
type unreachableError struct {
	socket string
	err    error
}

func (e *unreachableError) Error() string {
	cause := e.err
	if se, ok := errors.AsType[*os.SyscallError](e.err); ok {
		cause = se // "connect: no such file or directory", without the path again
	}
	if errors.Is(e.err, fs.ErrPermission) {
		return fmt.Sprintf("no permission to use stsmap's admin socket %s: run this as the user stsmap runs as, or as root (%v)", e.socket, cause)
	}
	return fmt.Sprintf("cannot reach stsmap's admin socket %s: is stsmap running, and is admin.socket the same in its config? (%v)", e.socket, cause)
}

func (e *unreachableError) Unwrap() []error { return []error{ErrUnreachable, e.err} }
