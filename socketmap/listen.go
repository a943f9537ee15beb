package socketmap

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Listen opens a listener for Serve (SPEC 1.5). An addr of the form
// "unix:/path" is a unix socket whose file is then set to mode; anything
// else is a TCP host:port, and mode is unused.
//
// A socket file left behind by an earlier run is removed first; a file that
// is not a socket, or a socket another process still accepts on, is an
// error.
func Listen(addr string, mode fs.FileMode) (net.Listener, error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok {
		return net.Listen("tcp", addr)
	}
	if err := RemoveStaleSocket(path); err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("socketmap: %w", err)
	}
	return l, nil
}

// RemoveStaleSocket removes a unix socket file at path that nothing accepts
// on any more (left by a process that is gone). A missing file is fine; a
// file that is not a socket, or a socket in use, is an error.
func RemoveStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socketmap: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socketmap: %s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("socketmap: %s is in use by another process; is another stsmap running?", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socketmap: %s: %w", path, err)
	}
	return os.Remove(path) // nobody accepts on it: stale
}

// Chown gives the unix socket of addr (as passed to Listen) an owner and a
// group, by name or number; "" leaves either unchanged. A TCP addr is left
// alone. Postfix's smtp(8) runs as user postfix, so a socket of mode 0660
// with group postfix is enough for it (SPEC 1.5).
func Chown(addr, owner, group string) error {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok || (owner == "" && group == "") {
		return nil
	}
	uid, gid := -1, -1
	if owner != "" {
		u, err := lookupID(owner, func(s string) (string, error) {
			u, err := user.Lookup(s)
			if err != nil {
				return "", err
			}
			return u.Uid, nil
		})
		if err != nil {
			return fmt.Errorf("socketmap: unix socket owner %q: %w", owner, err)
		}
		uid = u
	}
	if group != "" {
		g, err := lookupID(group, func(s string) (string, error) {
			g, err := user.LookupGroup(s)
			if err != nil {
				return "", err
			}
			return g.Gid, nil
		})
		if err != nil {
			return fmt.Errorf("socketmap: unix socket group %q: %w", group, err)
		}
		gid = g
	}
	if err := os.Chown(path, uid, gid); err != nil {
		return fmt.Errorf("socketmap: %w", err)
	}
	return nil
}

// lookupID returns a numeric name as is, else looks it up.
func lookupID(name string, lookup func(string) (string, error)) (int, error) {
	if n, err := strconv.Atoi(name); err == nil {
		return n, nil
	}
	s, err := lookup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(s)
}
