//! `cachemoney-gpt`: the libtorch worker behind the `train` and `pass1 (model = "gpt")`
//! stages. `cachemoney` starts it with one JSON request on stdin and reads one JSON
//! response from stdout (`gpt::worker`); it is not meant to be run by hand. It is a
//! separate program so that `cachemoney` itself never loads libtorch.

use std::process::ExitCode;

fn main() -> ExitCode {
    let request = match gpt::worker::read_request(std::io::stdin().lock()) {
        Ok(request) => request,
        Err(message) => {
            eprintln!("cachemoney-gpt: {message} (this program is started by `cachemoney run`)");
            return ExitCode::from(2);
        }
    };
    let result = cachemoney_gpt_torch::stages::run(&request);
    let failed = result.is_err();
    let response = gpt::Response::from(result);
    if gpt::worker::write_response(&response, std::io::stdout().lock()).is_err() || failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
