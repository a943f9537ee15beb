package main

import (
	"net"
	"os"
)

// notify sends a state line such as "READY=1" to systemd when the service
// runs with Type=notify (sd_notify(3)); without NOTIFY_SOCKET it does
// nothing. An abstract socket is named with a leading "@".
func notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(state))
	return err
}
